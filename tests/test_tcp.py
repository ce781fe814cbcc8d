# -*- test-case-name: tests.test_tcp -*-
"""
Tests for L{aiproxy.tcp}: eager TCP transports (L{send_eagerly}) and
L{batch}.

Each transport is a real L{twisted.internet.tcp.Connection} over one end
of a C{socket.socketpair()}; the test reads what the other end received.
The reactor is never run: it is a L{MemoryReactorClock} that records the
reader and writer changes asked of it, and the test calls C{doRead} and
C{doWrite} itself, as the reactor would.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from aiproxy import tcp as eager_tcp
from aiproxy.tcp import batch, send_eagerly


class RecordingReactor(MemoryReactorClock):
    """
    A reactor that records, in order, the C{addReader}, C{removeReader}
    and C{addWriter} calls it gets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fd_calls: list[tuple[str, Any]] = []

    def addReader(self, reader: IReadDescriptor) -> None:
        self.fd_calls.append(("addReader", reader))
        super().addReader(reader)

    def removeReader(self, reader: IReadDescriptor) -> None:
        self.fd_calls.append(("removeReader", reader))
        super().removeReader(reader)

    def addWriter(self, writer: IWriteDescriptor) -> None:
        self.fd_calls.append(("addWriter", writer))
        super().addWriter(writer)


class Pair(Protocol):
    """
    A protocol on a connected TCP transport over one end of a socket pair,
    and the other end (non-blocking); it runs C{on_data} with each piece of
    data it receives.

    @ivar sends: the data given to each C{writeSomeData} call.
    @ivar lost: the reasons given to C{connectionLost}.
    """

    transport: Any

    def __init__(self, reactor: RecordingReactor, on_data: Callable[[bytes], object]) -> None:
        self.reactor = reactor
        self.on_data = on_data
        self.lost: list[Any] = []
        self.sends: list[bytes] = []
        ours, self.peer = socket.socketpair()
        # A small send buffer: a few kilobytes fill it.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.peer.setblocking(False)
        self.transport = tcp.Connection(ours, self, reactor)
        self.transport.connected = True
        self.makeConnection(self.transport)
        write_some_data = self.transport.writeSomeData

        def counting(data: bytes) -> Any:
            self.sends.append(bytes(data))
            return write_some_data(data)

        self.transport.writeSomeData = counting  # type: ignore[method-assign]

    def dataReceived(self, data: bytes) -> None:
        self.on_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)

    def received(self) -> bytes:
        """
        The bytes the peer has received since the last call (read now,
        without waiting).
        """
        try:
            return self.peer.recv(1 << 20)
        except BlockingIOError:
            return b""

    def drain(self) -> bytes:
        """
        Let the reactor write until nothing is queued: what the peer
        received meanwhile.
        """
        received = b""
        for _ in range(1000):
            if self.transport not in self.reactor.getWriters():
                break
            self.transport.doWrite()
            received += self.received()
        return received

    def close(self) -> None:
        self.peer.close()
        if hasattr(self.transport, "socket"):
            self.transport.socket.close()


class EagerCase(SynchronousTestCase):
    """
    Eager transports over socket pairs, and a check that no batch is left
    open by a test.
    """

    def setUp(self) -> None:
        self.reactor = RecordingReactor()

    def tearDown(self) -> None:
        self.assertEqual(eager_tcp._BATCH.depth, 0)
        self.assertEqual(eager_tcp._BATCH.held, [])

    def pair(self, on_data: Callable[[bytes], object] = lambda data: None) -> Pair:
        """
        A new eager transport pair whose protocol runs C{on_data}.
        """
        pair = Pair(self.reactor, on_data)
        self.addCleanup(pair.close)
        send_eagerly(pair.transport)
        return pair


class SendEagerlyTests(EagerCase):
    """
    Which transports L{send_eagerly} changes.
    """

    def test_tcp_connection(self) -> None:
        """
        A plain TCP transport becomes an eager one that is still an
        instance of its class; done twice it stays so, and another
        transport of the same class gets the same eager class.
        """
        pair = self.pair()
        transport = pair.transport
        eager_class = type(transport)
        self.assertIsInstance(transport, tcp.Connection)
        self.assertIsInstance(transport, eager_tcp._Eager)
        send_eagerly(transport)
        self.assertIs(type(transport), eager_class)
        self.assertIs(type(self.pair().transport), eager_class)

    def test_other_transport(self) -> None:
        """
        A transport that is not a TCP connection is left alone, and its
        writes are as before.
        """
        transport = StringTransport()
        send_eagerly(transport)
        self.assertIs(type(transport), StringTransport)
        transport.write(b"hello")
        self.assertEqual(transport.value(), b"hello")

    def test_tls_writes_as_before(self) -> None:
        """
        On a connection that runs TLS, writes go to the TLS layer (the
        protocol, for a Twisted TCP transport) as before, never straight to
        the socket.
        """
        pair = self.pair()
        tls_writes: list[bytes] = []
        pair.transport.TLS = True
        pair.write = tls_writes.append  # type: ignore[attr-defined]
        pair.transport.write(b"secret")
        self.assertEqual(tls_writes, [b"secret"])
        self.assertEqual(pair.sends, [])
        self.assertEqual(pair.received(), b"")


class WriteTests(EagerCase):
    """
    Writes outside a read are sent at once.
    """

    def test_write_sent_at_once(self) -> None:
        """
        A write outside any read is on the peer's socket as soon as it
        returns, in one C{send}, without asking the reactor for anything; so
        is a C{writeSequence}, its pieces together.
        """
        pair = self.pair()
        pair.transport.write(b"data: hi\n\n")
        self.assertEqual(pair.received(), b"data: hi\n\n")
        pair.transport.writeSequence([b"a", b"b", b"c"])
        self.assertEqual(pair.received(), b"abc")
        self.assertEqual(pair.sends, [b"data: hi\n\n", b"abc"])
        self.assertEqual(self.reactor.fd_calls, [])

    def test_socket_full(self) -> None:
        """
        What the socket does not take is queued: the reactor is asked to
        write, a streaming producer is paused once the queue is over the
        buffer size, later writes queue behind, and the reactor's writes
        deliver everything in order.
        """
        pair = self.pair()
        producer = Protocol()
        paused: list[bool] = []
        producer.pauseProducing = lambda: paused.append(True)  # type: ignore[attr-defined]
        producer.resumeProducing = lambda: paused.append(False)  # type: ignore[attr-defined]
        pair.transport.registerProducer(producer, True)
        payload = bytes(range(256)) * 1024
        pair.transport.write(payload)
        self.assertEqual(len(pair.sends), 1)
        self.assertEqual(self.reactor.fd_calls, [("addWriter", pair.transport)])
        self.assertIn(pair.transport, self.reactor.getWriters())
        self.assertEqual(paused, [True])
        received = pair.received()
        self.assertTrue(0 < len(received) < len(payload), len(received))
        self.assertTrue(payload.startswith(received))

        pair.transport.write(b"tail")
        self.assertEqual(len(pair.sends), 1)
        self.assertEqual(received + pair.drain(), payload + b"tail")
        self.assertEqual(paused[-1], False)
        self.assertNotIn(False, paused[:-1])

    def test_peer_gone(self) -> None:
        """
        A write to a connection whose peer is gone is queued, and the
        reactor's next write finds the error.
        """
        pair = self.pair()
        pair.peer.close()
        pair.transport.write(b"late")
        self.assertEqual(self.reactor.fd_calls, [("addWriter", pair.transport)])
        self.assertIsInstance(pair.transport.doWrite(), ConnectionLost)


class ReadTests(EagerCase):
    """
    Writes made while a read is delivered are sent together at its end.
    """

    def test_writes_of_a_read_one_send(self) -> None:
        """
        Several writes made while one read is delivered are not on the
        socket before the read ends, then arrive in one C{send}.
        """
        pair: Pair
        seen_during_read: list[bytes] = []

        def answer(data: bytes) -> None:
            pair.transport.write(b"1:" + data)
            pair.transport.write(b"2:" + data)
            pair.transport.writeSequence([b"3:", data])
            seen_during_read.append(pair.received())

        pair = self.pair(answer)
        pair.peer.sendall(b"ping")
        self.assertIsNone(pair.transport.doRead())
        self.assertEqual(seen_during_read, [b""])
        self.assertEqual(pair.received(), b"1:ping2:ping3:ping")
        self.assertEqual(pair.sends, [b"1:ping2:ping3:ping"])
        self.assertEqual(self.reactor.fd_calls, [])

    def test_writes_to_another_transport(self) -> None:
        """
        Writes made to another eager transport while a read is delivered
        (the upstream's read relayed to the client) are sent at the end of
        that read, in one C{send}.
        """
        client = self.pair()

        def relay(data: bytes) -> None:
            for piece in data.split(b"|"):
                client.transport.write(piece + b"\n")
            self.assertEqual(client.received(), b"")

        upstream = self.pair(relay)
        upstream.peer.sendall(b"a|b|c")
        upstream.transport.doRead()
        self.assertEqual(client.received(), b"a\nb\nc\n")
        self.assertEqual(client.sends, [b"a\nb\nc\n"])
        self.assertEqual(upstream.sends, [])

    def test_batch_inside_read(self) -> None:
        """
        A L{batch} block inside a read does not send at its own end: the
        read's end does.
        """
        pair: Pair
        after_block: list[bytes] = []

        def answer(data: bytes) -> None:
            with batch():
                pair.transport.write(b"in block;")
            after_block.append(pair.received())
            pair.transport.write(b"after")

        pair = self.pair(answer)
        pair.peer.sendall(b"x")
        pair.transport.doRead()
        self.assertEqual(after_block, [b""])
        self.assertEqual(pair.sends, [b"in block;after"])

    def test_failing_read_still_sends(self) -> None:
        """
        When the protocol raises while handling a read, what it wrote
        before is still sent, and the batch is closed.
        """
        pair: Pair

        def fail(data: bytes) -> None:
            pair.transport.write(b"partial")
            raise ValueError("bug")

        pair = self.pair(fail)
        pair.peer.sendall(b"x")
        self.assertRaises(ValueError, pair.transport.doRead)
        self.assertEqual(pair.received(), b"partial")


class BatchTests(EagerCase):
    """
    L{batch} outside any read.
    """

    def test_block_one_send(self) -> None:
        """
        The writes of a block, nested blocks included, are sent together at
        the end of the outermost one, in one C{send} per transport.
        """
        first = self.pair()
        second = self.pair()
        with batch():
            first.transport.write(b"a")
            with batch():
                second.transport.write(b"x")
                first.transport.write(b"b")
            second.transport.write(b"y")
            self.assertEqual((first.received(), second.received()), (b"", b""))
        self.assertEqual(first.sends, [b"ab"])
        self.assertEqual(second.sends, [b"xy"])
        self.assertEqual((first.received(), second.received()), (b"ab", b"xy"))

    def test_behind_queued_data(self) -> None:
        """
        With data already queued, the block's writes queue behind it (the
        order on the wire is kept).
        """
        pair = self.pair()
        payload = b"q" * (256 * 1024)
        pair.transport.write(payload)
        self.assertIn(pair.transport, self.reactor.getWriters())
        with batch():
            pair.transport.write(b"next")
        self.assertEqual(len(pair.sends), 1)
        received = pair.received()
        self.assertEqual(received + pair.drain(), payload + b"next")

    def test_aborted(self) -> None:
        """
        Writes held for a block whose transport is aborted meanwhile are
        dropped (neither sent nor queued), as Twisted drops what an aborted
        transport buffered.
        """
        pair = self.pair()
        with batch():
            pair.transport.write(b"dropped")
            pair.transport.abortConnection()
        self.assertEqual(pair.sends, [])
        self.assertNotIn(("addWriter", pair.transport), self.reactor.fd_calls)
        self.reactor.advance(0)
        self.assertEqual(len(pair.lost), 1)
        self.assertEqual(pair.received(), b"")

    def test_closing(self) -> None:
        """
        Writes held for a block whose transport started closing meanwhile
        are still sent before it closes.
        """
        pair = self.pair()
        with batch():
            pair.transport.write(b"last words")
            pair.transport.loseConnection()
        self.assertEqual(pair.received(), b"")
        self.assertIsNotNone(pair.transport.doWrite())
        self.assertEqual(pair.received(), b"last words")


class PauseTests(EagerCase):
    """
    A pause asked for while a read is delivered takes effect at its end.
    """

    def test_pause_after_read(self) -> None:
        """
        Pausing during a read stops reading once the read was handled, not
        before; pausing outside a read stops at once.
        """
        pair: Pair
        during: list[int] = []

        def pause(data: bytes) -> None:
            pair.transport.pauseProducing()
            during.append(len(self.reactor.fd_calls))

        pair = self.pair(pause)
        pair.peer.sendall(b"head")
        pair.transport.doRead()
        self.assertEqual(during, [0])
        self.assertEqual(self.reactor.fd_calls, [("removeReader", pair.transport)])
        pair.transport.resumeProducing()
        self.assertEqual(self.reactor.fd_calls[-1], ("addReader", pair.transport))
        pair.transport.pauseProducing()
        self.assertEqual(self.reactor.fd_calls[-1], ("removeReader", pair.transport))

    def test_pause_resume_within_read(self) -> None:
        """
        A pause undone within the same read costs nothing: the reactor is
        never asked to stop nor start reading. Asked for again after the
        resume, it takes effect at the end of the read.
        """
        pair = self.pair()

        def pause_resume(data: bytes) -> None:
            pair.transport.pauseProducing()
            pair.transport.resumeProducing()
            if data == b"again":
                pair.transport.pauseProducing()

        pair.on_data = pause_resume
        pair.peer.sendall(b"head")
        pair.transport.doRead()
        self.assertEqual(self.reactor.fd_calls, [])
        pair.peer.sendall(b"again")
        pair.transport.doRead()
        self.assertEqual(self.reactor.fd_calls, [("removeReader", pair.transport)])
