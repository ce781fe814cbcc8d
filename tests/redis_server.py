"""
Real C{redis-server} processes for end-to-end tests, in the test's own
reactor: one server, or a Redis Cluster of three.

Use it from a trial L{twisted.trial.unittest.TestCase} (real reactor) with
C{async def} tests::

    from tests.redis_server import redis_skip_reason, start_redis

    class MyTests(TestCase):
        skip = redis_skip_reason()

        async def test_shared(self) -> None:
            redis = await start_redis(self, password="s3cret")
            conf = redis.conf(limit=100, time_window=60)  # ai-rate-limiting fields
            redis.command("GET", "some-key")               # a blocking call, for checks
            redis.pause()                                  # SIGSTOP: it stops answering
            redis.resume()
            await redis.kill()                             # SIGKILL
            await redis.start()                            # again, on the same port

Each server listens on a free loopback port, keeps nothing on disk
(C{--save ''}, C{--appendonly no}) and works in its own temporary
directory; the test's cleanup stops it. Without C{redis-server} the tests
are skipped, except when C{CI} is C{true}: then they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import SkipTest

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.daemon import closed_port, wait_until
from tests.helpers import certificate, key_pem

__all__ = [
    "RedisCluster",
    "RedisReplyError",
    "RedisServer",
    "redis_command",
    "redis_skip_reason",
    "start_redis",
    "start_redis_cluster",
]

REDIS_SERVER = shutil.which("redis-server")

#: What a server prints once it accepts connections (Redis 6 and 7).
_READY = "Ready to accept connections"
_MISSING = "redis-server is not installed (apt-get install redis-server)"


def redis_skip_reason() -> str | None:
    """
    Why Redis tests cannot run here (a class's C{skip}), or L{None}; always
    L{None} when C{CI} is C{true}, so that L{start_redis} fails instead.
    """
    if REDIS_SERVER is None and os.environ.get("CI") != "true":
        return _MISSING
    return None


def _require_redis() -> str:
    if REDIS_SERVER is None and os.environ.get("CI") == "true":
        raise AssertionError("redis-server is not installed, and CI=true requires it")
    if REDIS_SERVER is None:
        raise SkipTest(_MISSING)
    return REDIS_SERVER


class RedisReplyError(Exception):
    """Redis answered a L{redis_command} with an error."""


def _encode(args: Sequence[Any]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: Any) -> Any:
    line = stream.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(stream) for _ in range(size)]
    raise ValueError(f"not a RESP reply: {line!r}")


def redis_command(
    port: int,
    *args: Any,
    password: str | None = None,
    username: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> Any:
    """
    Send one command to the server on loopback C{port} and return its reply
    (C{str}, C{int}, L{None} or a list), blocking: for a test's checks.

    @raise RedisReplyError: Redis answered with an error.
    """
    with socket.create_connection(("127.0.0.1", port), timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        stream = sock.makefile("rb")
        commands = [args]
        if password is not None:
            commands.insert(0, ("AUTH", username, password) if username else ("AUTH", password))
        sock.sendall(b"".join(_encode(command) for command in commands))
        replies = [_read_reply(stream) for _ in commands]
    for reply in replies:
        if isinstance(reply, RedisReplyError):
            raise reply
    return replies[-1]


class RedisServer(ProcessProtocol):
    """
    A C{redis-server} child process on a fixed loopback port.

    @ivar port: its port (the TLS port when started with C{tls}).
    @ivar password: the password of the C{default} user, if any.
    @ivar username: the ACL user made at start, if any (its password is
        L{password}; then the C{default} user is off).
    @ivar lines: everything it printed, one entry per line.
    """

    def __init__(
        self,
        directory: Path,
        port: int,
        *,
        password: str | None = None,
        username: str | None = None,
        cluster_port: int | None = None,
        tls: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.port = port
        self.password = password
        self.username = username
        self.cluster_port = cluster_port
        self.lines: list[str] = []
        self.paused = False
        self.running = False
        self._partial = b""
        self._ready: Deferred[None] | None = None
        self.ended: Deferred[None] = Deferred()
        self.tls_context: ssl.SSLContext | None = None
        args = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
        if tls:
            args += ["--port", "0", "--tls-port", str(port), *self._make_certificates()]
        else:
            args += ["--port", str(port)]
        if username is not None:
            args += ["--user", "default", "off", "--user", username, "on", f">{password}"]
            args += ["~*", "&*", "+@all"]
        elif password is not None:
            args += ["--requirepass", password]
        if cluster_port is not None:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(cluster_port)]
            args += ["--cluster-config-file", str(directory / "nodes.conf")]
        self.args = [*args, *extra]

    def _make_certificates(self) -> list[str]:
        """
        A CA and a certificate for 127.0.0.1 signed by it; the options that
        serve them. L{tls_context} trusts the CA (C{ca.pem} in L{directory}).
        """
        ca_key = ec.generate_private_key(ec.SECP256R1())
        key = ec.generate_private_key(ec.SECP256R1())
        ca = certificate(ca_key, "redis test CA", ca_key, "redis test CA", ca=True)
        leaf = certificate(key, "127.0.0.1", ca_key, "redis test CA", False, ["127.0.0.1"])
        for name, cert in {"ca.pem": ca, "server.pem": leaf}.items():
            (self.directory / name).write_bytes(cert.public_bytes(Encoding.PEM))
        (self.directory / "server.key").write_bytes(key_pem(key))
        self.tls_context = ssl.create_default_context(cafile=str(self.directory / "ca.pem"))
        d = self.directory
        return [
            *("--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key")),
            *("--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "no"),
        ]

    # -- the process --------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if _READY in line and self._ready is not None and not self._ready.called:
                self._ready.callback(None)

    errReceived = outReceived  # noqa: N815

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.running = False
        self.paused = False
        if self._ready is not None and not self._ready.called:
            self._ready.errback(AssertionError("redis-server exited:\n" + self.output))
        self.ended.callback(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def start(self, timeout: float = 10.0) -> None:
        """
        Start it (again, on the same port) and wait until it accepts
        connections.

        @raise AssertionError: it exited or was not ready in time.
        """
        assert not self.running, "redis-server is running"
        self.ended = Deferred()
        self._ready = Deferred()
        self._partial = b""
        command = [_require_redis(), *self.args]
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self, command[0], command, env=dict(os.environ), path=str(self.directory)
        )
        self.running = True
        await self._ready.addTimeout(timeout, reactor)  # type: ignore[arg-type]

    def signal(self, name: str) -> None:
        """Send it a signal (C{"STOP"}, C{"CONT"}, ...)."""
        assert self.transport is not None, "not started"
        os.kill(self.transport.pid, getattr(signal, f"SIG{name}"))

    def pause(self) -> None:
        """
        Stop it (SIGSTOP): it keeps its connections but answers nothing.
        """
        self.signal("STOP")
        self.paused = True

    def resume(self) -> None:
        """Let it go on after L{pause} (SIGCONT)."""
        self.signal("CONT")
        self.paused = False

    async def kill(self) -> None:
        """
        Kill it (SIGKILL) and wait until it is gone; L{start} brings it back.
        """
        if self.running:
            self.signal("KILL")
            await self.ended

    async def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM (after SIGCONT if paused), then SIGKILL if it lingers.
        """
        if not self.running:
            return
        if self.paused:
            self.resume()
        self.signal("TERM")
        try:
            await wait_until(lambda: not self.running, timeout, what="redis-server to stop")
        except AssertionError:
            await self.kill()
        await self.ended

    # -- using it -----------------------------------------------------------------

    def command(self, *args: Any) -> Any:
        """
        Run one command on it (blocking, with its credentials): its reply.
        """
        return redis_command(
            self.port, *args, password=self.password, username=self.username, tls=self.tls_context
        )

    def conf(self, **fields: Any) -> dict[str, Any]:
        """
        The C{ai-rate-limiting} fields (C{policy: redis}) that reach it,
        with C{fields} added or replacing them.
        """
        conf: dict[str, Any] = {"policy": "redis", "redis_host": "127.0.0.1"}
        conf["redis_port"] = self.port
        if self.password is not None:
            conf["redis_password"] = self.password
        if self.username is not None:
            conf["redis_username"] = self.username
        if self.tls_context is not None:
            conf["redis_ssl"] = True
        conf.update(fields)
        return conf


def _stop(server: RedisServer) -> Deferred[None]:
    return Deferred.fromCoroutine(server.stop())


async def start_redis(
    testcase: TestCase,
    *,
    password: str | None = None,
    username: str | None = None,
    tls: bool = False,
    extra: Sequence[str] = (),
    cluster: bool = False,
) -> RedisServer:
    """
    Start a C{redis-server} on a free loopback port and wait until it is
    ready; the test's cleanup stops it.

    @param password: C{--requirepass} (or the ACL user's password).
    @param username: an ACL user to make, with every right and the
        C{password}; the C{default} user is then turned off.
    @param tls: serve TLS only, with a certificate for 127.0.0.1 made by a
        CA of its own (L{RedisServer.tls_context} trusts it).
    @param extra: more C{redis-server} options.
    @param cluster: start it as a cluster node (L{start_redis_cluster}).
    @raise SkipTest: C{redis-server} is not installed (unless C{CI=true}).
    """
    _require_redis()
    directory = Path(testcase.mktemp()).resolve()
    directory.mkdir(parents=True)
    for attempt in range(3):
        server = RedisServer(
            directory,
            closed_port(),
            password=password,
            username=username,
            cluster_port=closed_port() if cluster else None,
            tls=tls,
            extra=extra,
        )
        testcase.addCleanup(_stop, server)
        try:
            await server.start()
        except AssertionError:
            # the free port was taken in between: try another one
            if attempt == 2 or "Address already in use" not in server.output:
                raise
        else:
            return server
    raise AssertionError("unreachable")


class RedisCluster:
    """
    Three (or more) cluster nodes, the slots split evenly in order.

    @ivar nodes: the L{RedisServer}s, in slot order.
    @ivar ids: their cluster node ids, in the same order.
    """

    def __init__(self, nodes: list[RedisServer], ids: list[str], name: str) -> None:
        self.nodes = nodes
        self.ids = ids
        self.name = name

    def node_for(self, key: str) -> RedisServer:
        """
        The node that serves C{key} now (as C{CLUSTER SLOTS} says).
        """
        slot = self.nodes[0].command("CLUSTER", "KEYSLOT", key)
        for start, end, master, *_ in self.nodes[0].command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == master[1])
        raise AssertionError(f"slot {slot} is not served")

    def conf(self, **fields: Any) -> dict[str, Any]:
        """
        The C{ai-rate-limiting} fields (C{policy: redis-cluster}) that reach
        it, with C{fields} added or replacing them.
        """
        conf: dict[str, Any] = {
            "policy": "redis-cluster",
            "redis_cluster_nodes": [f"127.0.0.1:{node.port}" for node in self.nodes],
            "redis_cluster_name": self.name,
        }
        if self.nodes[0].password is not None:
            conf["redis_password"] = self.nodes[0].password
        conf.update(fields)
        return conf

    async def wait_ok(self, timeout: float = 15.0) -> None:
        """
        Wait until every node says C{cluster_state:ok} and knows every node.
        """

        def ok() -> bool:
            for node in self.nodes:
                info = node.command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False
                if f"cluster_known_nodes:{len(self.nodes)}" not in info:
                    return False
            return True

        await wait_until(ok, timeout, interval=0.05, what="cluster_state:ok")


async def start_redis_cluster(
    testcase: TestCase, size: int = 3, password: str | None = None
) -> RedisCluster:
    """
    Start C{size} cluster nodes, give each an equal run of the 16384 slots,
    join them (C{CLUSTER MEET}) and wait for C{cluster_state:ok}; the test's
    cleanup stops them.
    """
    nodes = [await start_redis(testcase, password=password, cluster=True) for _ in range(size)]
    ids = [node.command("CLUSTER", "MYID") for node in nodes]
    for i, node in enumerate(nodes):
        node.command("CLUSTER", "ADDSLOTSRANGE", i * 16384 // size, (i + 1) * 16384 // size - 1)
    for node in nodes[1:]:
        nodes[0].command("CLUSTER", "MEET", "127.0.0.1", node.port, node.cluster_port)
    cluster = RedisCluster(nodes, ids, "test-cluster")
    await cluster.wait_ok()
    return cluster
