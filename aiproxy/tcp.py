# -*- test-case-name: tests.test_e2e -*-
"""
TCP transports of both legs, the client's connections and the upstream's:
their socket options, and writes sent in the turn they are made.

A Twisted TCP transport queues what it is given and sends it on the
reactor's next pass, once C{epoll} says the socket is writable: every write
costs two C{epoll_ctl} calls and a reactor turn, and the first token of a
stream waits until every other socket ready in the same turn was handled.
An eager transport (L{send_eagerly}) sends instead as soon as the read it
was written in has been handled, in one C{send} for all that read wrote
to it (an upstream read often holds many events, each written on its
own), or at once when written outside any read (a timer). What the socket
does not take is queued as before, and pauses the transport's producer as
before. L{batch} gathers the writes of a block the same way.

An eager transport also takes a pause asked for while it delivers a read
(Twisted's HTTP client pauses an upstream connection at every response
head until the body has a protocol, which is given one at once) when that
read was handled: a pause undone within the same read costs no
C{epoll_ctl}.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.tcp import Connection
from twisted.logger import Logger

__all__ = ["batch", "send_eagerly", "set_no_delay"]

log = Logger()


def set_no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on a TCP transport (small writes go out at
    once); other transports are left alone.
    """
    set_tcp_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_tcp_no_delay is not None:
        try:
            set_tcp_no_delay(True)
        except OSError:
            pass


def _idle(transport: Connection) -> bool:
    """
    Whether C{transport} can send now: a plain (not TLS) connection, open
    for writing, with nothing queued.
    """
    return bool(
        transport.connected
        and not transport.disconnecting
        and not transport._aborting
        and not transport._writeDisconnected
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def _send(transport: Connection, data: bytes) -> None:
    """
    Send C{data} now; queue what the socket does not take (on an error,
    all of it: the reactor's next write finds the error and closes the
    connection as usual).
    """
    sent = transport.writeSomeData(data)
    if sent.__class__ is int:
        if sent == len(data):
            return
        data = data[sent:]
    FileDescriptor.write(transport, data)


class _Batch:
    """
    The writes held until the end of the reads (or L{batch} blocks) being
    handled.

    @ivar depth: how many are being handled (nested).
    @ivar held: the transports holding writes.
    """

    __slots__ = ("depth", "held")

    def __init__(self) -> None:
        self.depth = 0
        self.held: list[_Eager] = []

    def end(self) -> None:
        """
        One read or block was handled: after the outermost, send what each
        transport holds.
        """
        self.depth -= 1
        if self.depth or not self.held:
            return
        held, self.held = self.held, []
        for transport in held:
            try:
                transport.release()
            except Exception:
                log.failure("sending the writes of a read failed")


_BATCH = _Batch()


class _Eager(Connection):
    """
    A TCP connection whose writes are sent at the end of the read they
    were made in (together), or at once outside any read; and that pauses
    after the read it is delivering.

    @ivar _held: the writes waiting for the end of the batch, or L{None}.
    @ivar _reading: a read of this connection is being delivered.
    @ivar _pause: a pause was asked for during that read.
    """

    _held: list[bytes] | None = None
    _reading = False
    _pause = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None and isinstance(data, bytes):
            held.append(data)
        elif data.__class__ is bytes and data and _idle(self):
            if _BATCH.depth:
                self._held = [data]
                _BATCH.held.append(self)
            else:
                _send(self, data)
        else:
            super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if not iovec:
            return
        try:
            data = b"".join(iovec)
        except TypeError:
            # Not bytes: Twisted's own check raises its usual error.
            super().writeSequence(iovec)
            return
        self.write(data)

    def release(self) -> None:
        """
        Send the writes held until the end of the batch.
        """
        held = self._held
        self._held = None
        if not held or self._aborting:
            # Aborted: what it buffered is dropped, as Twisted drops it.
            return
        data = b"".join(held)
        if data and _idle(self):
            _send(self, data)
        else:
            # Closing or closed: Twisted's write queues it or drops it.
            super().write(data)

    def doRead(self) -> Any:
        batch = _BATCH
        batch.depth += 1
        self._reading = True
        try:
            return super().doRead()
        finally:
            self._reading = False
            if self._pause:
                self._pause = False
                super().pauseProducing()
            batch.end()

    def pauseProducing(self) -> None:
        if self._reading:
            self._pause = True
        else:
            super().pauseProducing()

    def resumeProducing(self) -> None:
        if self._pause:
            # Paused and resumed within one read: it never stopped reading.
            self._pause = False
        else:
            super().resumeProducing()


#: The eager subclass of each transport class met so far.
_EAGER: dict[type, type] = {}


def send_eagerly(transport: Any) -> None:
    """
    Make a plain TCP transport an eager one (once per transport; any other
    transport is left alone).
    """
    cls = type(transport)
    if not issubclass(cls, Connection) or issubclass(cls, _Eager):
        return
    eager = _EAGER.get(cls)
    if eager is None:
        eager = _EAGER[cls] = type(cls.__name__, (_Eager, cls), {"__module__": __name__})
    transport.__class__ = eager


@contextmanager
def batch() -> Iterator[None]:
    """
    Hold what the block writes to eager transports, and send it at its end
    (or at the end of the read it is part of): one C{send} per transport.
    """
    _BATCH.depth += 1
    try:
        yield
    finally:
        _BATCH.end()
