# -*- test-case-name: tests.test_budget_redis -*-
"""
The wire of one Redis connection: commands encoded here (RESP), written
together, and their replies, parsed by C{txredisapi}'s protocol, handed in
order to the batch that asked for them; no Deferred, coroutine or timer
per command.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from txredisapi import RedisProtocol

from aiproxy.budget.store import StoreUnavailable

__all__ = ["Command", "RedisWire", "encode"]

Command = tuple[Any, ...]

#: Called with a batch's replies (error replies as their
#: C{txredisapi.ResponseError}), or with the L{Failure} that lost them.
Done = Callable[[Any], None]


def _bulk(argument: Any) -> bytes:
    data = argument if isinstance(argument, bytes) else str(argument).encode("utf-8")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode(commands: Sequence[Command]) -> bytes:
    """
    C{commands} as one RESP byte string.
    """
    return b"".join(
        b"*%d\r\n%s" % (len(command), b"".join(map(_bulk, command))) for command in commands
    )


class _Batch:
    __slots__ = ("count", "done", "replies")

    def __init__(self, count: int, done: Done) -> None:
        self.count = count
        self.done = done
        self.replies: list[Any] = []


class RedisWire(RedisProtocol):  # type: ignore[misc]
    """
    C{txredisapi}'s protocol for its reply parser; commands are sent with
    L{send}. Its factory is told when it is made and lost.

    @ivar lost_reason: why the connection was lost, once it was.
    @ivar gone: fires when the connection is lost.
    """

    def __init__(self, owner: Any) -> None:
        super().__init__(charset="utf-8", convertNumbers=False)
        self.factory = owner
        self.lost_reason: Failure | None = None
        self.gone: Deferred[None] = Deferred()
        self._batches: deque[_Batch] = deque()

    def connectionMade(self) -> Any:  # noqa: N802
        self.factory._live.add(self)
        return super().connectionMade()

    def send(self, commands: Sequence[Command], done: Done) -> None:
        """
        Write C{commands} at once; C{done} gets their replies, in order.
        """
        self._batches.append(_Batch(len(commands), done))
        self.transport.write(encode(commands))

    def replyReceived(self, reply: Any) -> None:  # noqa: N802
        batches = self._batches
        if not batches:
            return
        batch = batches[0]
        batch.replies.append(reply)
        if len(batch.replies) == batch.count:
            batches.popleft()
            batch.done(batch.replies)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.lost_reason = reason
        self.factory._lost(self)
        try:
            super().connectionLost(reason)
        finally:
            batches, self._batches = self._batches, deque()
            lost = Failure(StoreUnavailable(f"{self.factory.label} connection lost"))
            for batch in batches:
                batch.done(lost)
            self.gone.callback(None)
