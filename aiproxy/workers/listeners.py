# -*- test-case-name: tests.test_workers -*-
"""
The listening sockets shared by the parent and its workers.

The parent opens each listener from its endpoint string as a single
process would (L{SharedListener}): a TCP or UNIX socket it binds, or a
socket systemd passed; it then stops reading from it, so that it never
accepts, and passes its descriptor to every worker (L{SharedSocket}). A
worker adopts it (L{SharedPortEndpoint}) and accepts on it; the kernel
hands each connection to one of them.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "SHAREABLE_ENDPOINTS",
    "SharedListener",
    "SharedPortEndpoint",
    "SharedSocket",
    "share_problem",
]

log = Logger()

#: Endpoint types whose listening socket workers can share: a TLS endpoint
#: would need its context in every worker, a plugin's endpoint may not be a
#: socket at all.
SHAREABLE_ENDPOINTS = frozenset({"tcp", "tcp6", "unix", "systemd"})

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def share_problem(endpoint: str) -> str | None:
    """
    Why worker processes cannot share the listener of C{endpoint}, or
    L{None} when they can.
    """
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in SHAREABLE_ENDPOINTS:
        return None
    return (
        f"cannot share {endpoint!r} with worker processes: only tcp, tcp6, unix and systemd "
        "endpoints can be (terminate TLS in front of aiproxy, or run workers: 1)"
    )


@dataclass(frozen=True)
class SharedSocket:
    """
    A listening socket as passed to a worker: its descriptor (the same
    number in the parent and the worker), its address family and backlog.

    @ivar family: C{"INET"}, C{"INET6"} or C{"UNIX"}.
    """

    fd: int
    family: str
    backlog: int

    def argument(self) -> str:
        """
        The value of the worker's C{--socket} option.
        """
        return f"{self.fd}:{self.family}:{self.backlog}"

    @classmethod
    def parse(cls, text: str) -> SharedSocket:
        """
        The socket a C{--socket FD:FAMILY:BACKLOG} option names.

        @raise ValueError: it names none.
        """
        fd, family, backlog = text.split(":")
        if family not in _FAMILIES:
            raise ValueError(f"unknown address family {family!r}")
        return cls(int(fd), family, int(backlog))


class _SharedPortFactory(ServerFactory):
    """
    The factory of the parent's copy of a listener: the parent never
    accepts (it stopped reading), so it never builds a protocol.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return None


def _family(address: Any) -> str:
    if isinstance(address, IPv6Address):
        return "INET6"
    if isinstance(address, IPv4Address):
        return "INET"
    if isinstance(address, UNIXAddress):
        return "UNIX"
    raise ValueError(f"cannot share a listener on {address!r}")


class SharedListener(Service):
    """
    The parent's listener on one endpoint: listening, never accepting.

    @ivar endpoint: the endpoint string.
    @ivar port: the listening port, once listening.
    """

    def __init__(self, reactor: Any, endpoint: str) -> None:
        self._reactor = reactor
        self.endpoint = endpoint
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        """
        Listen now (privileged ports are bound before twistd drops its
        privileges), or raise why not.
        """
        result: list[Any] = []
        serverFromString(self._reactor, self.endpoint).listen(_SharedPortFactory()).addBoth(
            result.append
        )
        if not result:
            raise RuntimeError(f"{self.endpoint!r} did not listen at once")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        port = result[0]
        port.stopReading()
        # Closing the parent's copy must never shut the socket down for the
        # workers (Twisted shuts down the listening sockets it created).
        port._shouldShutdown = False
        self.port = port
        log.info("listening on {endpoint} for the worker processes", endpoint=self.endpoint)

    @property
    def shared(self) -> SharedSocket:
        """
        The socket to pass to the workers.
        """
        assert self.port is not None, "not listening"
        # An adopted TCP socket keeps the backlog it was given (unknown):
        # the system's largest is what a worker would ask for.
        backlog = getattr(self.port, "backlog", None) or socket.SOMAXCONN
        return SharedSocket(self.port.fileno(), _family(self.port.getHost()), backlog)

    def stopService(self) -> Deferred[None]:
        """
        Close the parent's copy of the socket (the workers' copies stay
        open until they stop listening).
        """
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def _mode_of(path: Any) -> int:
    """
    The permission bits of the UNIX socket file at C{path}; Twisted's
    default for a socket without a file (an abstract one).
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, TypeError, ValueError):
        return 0o666


class _SharedUNIXPort(unix.Port):
    """
    A worker's copy of a UNIX listener: unlike Twisted's adopted UNIX
    port, it keeps the socket file's mode, and when it stops it neither
    shuts the socket down nor removes its file (the other workers still
    accept on it).
    """

    _shouldShutdown = False

    def __init__(
        self,
        fileName: Any,
        factory: Any,
        backlog: int = 50,
        mode: int = 0o666,
        reactor: Any = None,
        wantPID: int = 0,
    ) -> None:
        super().__init__(fileName, factory, backlog, _mode_of(fileName), reactor, wantPID)

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class SharedPortEndpoint:
    """
    A worker's endpoint over a socket its parent passed: listening adopts
    it (C{reactor.adoptStreamPort} for TCP) and closes the passed
    descriptor, as Twisted's C{AdoptedStreamServerEndpoint} does.
    """

    def __init__(self, reactor: Any, shared: SharedSocket) -> None:
        self._reactor = reactor
        self.shared = shared
        self._used = False

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        if self._used:
            return fail(RuntimeError("the shared socket was adopted already"))
        self._used = True
        shared = self.shared
        try:
            if shared.family == "UNIX":
                port = _SharedUNIXPort._fromListeningDescriptor(
                    self._reactor, shared.fd, protocolFactory
                )
                # Adopting listens again: keep the parent's backlog.
                port.backlog = shared.backlog
                port.startListening()
            else:
                port = self._reactor.adoptStreamPort(
                    shared.fd, _FAMILIES[shared.family], protocolFactory
                )
            os.close(shared.fd)
        except Exception:
            return fail()
        return succeed(port)
