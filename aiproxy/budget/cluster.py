# -*- test-case-name: tests.test_budget_redis -*-
"""
Token counters in a Redis Cluster (C{policy: redis-cluster}).

A key belongs to one of 16384 slots: the CRC16 (XMODEM) of the key, or of
its hash tag (the text between the first C{{} and the next C{}}), as the
Redis Cluster specification says. Which node serves each slot comes from
C{CLUSTER SLOTS} of any node that answers (the configured nodes are seeds).

C{MGET} and the charge script need all their keys in one slot, so a
C{spent} or C{charge} sends one command per slot involved, and all the
commands for one node together: one round trip per node. A C{MOVED} answer
moves the slot in the map (which is then fetched again) and an C{ASK} one
sends the command to the node named, after C{ASKING}; either is retried
once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from txredisapi import ResponseError
from zope.interface import implementer

from aiproxy.budget.redis import Command, RedisConnection, charge_command
from aiproxy.budget.store import StoreUnavailable
from aiproxy.interfaces import ICounterStore

__all__ = ["ClusterCounters", "SLOTS", "crc16", "key_slot"]

_log = Logger()

SLOTS = 16384

Address = tuple[str, int]


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """
    The CRC16 of C{data} that Redis Cluster uses (XMODEM: polynomial 0x1021,
    initial value 0).
    """
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """
    The cluster slot of C{key}, as C{CLUSTER KEYSLOT} gives it.
    """
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


def _address(text: str, host: str = "") -> Address:
    """
    C{host:port} (or C{[v6]:port}) as a pair; C{host} stands for a missing
    host, 6379 for a missing port.
    """
    name, colon, port = text.rpartition(":")
    if not colon:
        return (text, 6379)
    return (name.strip("[]") or host, int(port))


def _where(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def _slot_map(reply: Any, host: str) -> list[Address | None]:
    """
    The node of every slot from a C{CLUSTER SLOTS} reply got from C{host}
    (which an empty endpoint stands for); L{None} for an unserved slot.
    """
    slots: list[Address | None] = [None] * SLOTS
    for start, end, master, *_ in reply:
        if master[0] != "?":
            slots[start : end + 1] = [(master[0] or host, int(master[1]))] * (end + 1 - start)
    return slots


@dataclass(eq=False)
class _Job:
    """
    One command for the keys of one slot, and where it goes.
    """

    slot: int
    command: Command
    node: Address | None = None
    asking: bool = False
    reply: Any = None


@implementer(ICounterStore)
class ClusterCounters:
    """
    Counters in a Redis Cluster: one L{RedisConnection} per node, made when
    the slot map first names the node.
    """

    def __init__(self, conf: Mapping[str, Any], reactor: Any) -> None:
        """
        @param conf: an C{ai-rate-limiting} config: C{redis_cluster_nodes},
            C{redis_cluster_name}, C{redis_username}, C{redis_password},
            C{redis_timeout}, C{redis_cluster_ssl} and
            C{redis_cluster_ssl_verify}.
        """
        self._conf = {**conf, "redis_database": 0}
        self._reactor = reactor
        try:
            self._seeds = [_address(node) for node in conf["redis_cluster_nodes"]]
        except ValueError:
            raise ValueError("redis_cluster_nodes: each must be host:port") from None
        self.description = f"redis-cluster {conf.get('redis_cluster_name') or ''}".strip()
        self.nodes: dict[Address, RedisConnection] = {}
        self._slots: list[Address | None] | None = None
        self._refreshing: list[Deferred[None]] | None = None
        self.closed = False
        self._refresh().addErrback(self._refresh_failed)

    def spent(self, keys: Sequence[str]) -> Deferred[list[int]]:
        if not keys:
            return defer.succeed([])
        return Deferred.fromCoroutine(self._spent(keys))

    def charge(self, charges: Sequence[tuple[str, int, int]]) -> Deferred[None]:
        if not charges:
            return defer.succeed(None)
        return Deferred.fromCoroutine(self._charge(charges))

    def close(self) -> Deferred[None]:
        self.closed = True
        closing = [node.close() for node in self.nodes.values()]
        return defer.gatherResults(closing).addCallback(lambda _: None)

    async def _spent(self, keys: Sequence[str]) -> list[int]:
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(key), []).append(i)
        jobs = [_Job(slot, ("MGET", *(keys[i] for i in found))) for slot, found in by_slot.items()]
        await self._execute(jobs)
        counts = [0] * len(keys)
        for job, found in zip(jobs, by_slot.values(), strict=True):
            for i, value in zip(found, job.reply, strict=True):
                counts[i] = int(value or 0)
        return counts

    async def _charge(self, charges: Sequence[tuple[str, int, int]]) -> None:
        by_slot: dict[int, list[tuple[str, int, int]]] = {}
        for charge in charges:
            by_slot.setdefault(key_slot(charge[0]), []).append(charge)
        await self._execute([_Job(slot, charge_command(some)) for slot, some in by_slot.items()])

    async def _execute(self, jobs: list[_Job]) -> None:
        if self._slots is None or any(self._slots[job.slot] is None for job in jobs):
            await self._refresh()
        assert self._slots is not None
        for job in jobs:
            job.node = self._slots[job.slot]
        await self._round(jobs)
        moved = [job for job in jobs if self._redirect(job) == "MOVED"]
        again = [job for job in jobs if job.asking or job in moved]
        if again:
            refresh = self._refresh().addErrback(self._refresh_failed) if moved else None
            await self._round(again)
            if refresh is not None:
                await refresh
        for job in jobs:
            if isinstance(job.reply, ResponseError):
                where = _where(job.node) if job.node else "?"
                raise StoreUnavailable(f"{self.description}: {where} answered: {job.reply}")

    def _redirect(self, job: _Job) -> str | None:
        """
        Follow a C{MOVED} or C{ASK} reply of C{job}: say which it was.
        """
        kind, _, rest = str(job.reply).partition(" ")
        if not isinstance(job.reply, ResponseError) or kind not in ("MOVED", "ASK"):
            return None
        assert self._slots is not None and job.node is not None
        target = _address(rest.partition(" ")[2], job.node[0])
        job.node, job.asking = target, kind == "ASK"
        if kind == "MOVED":
            self._slots[job.slot] = target
            _log.info(
                "{store}: slot {slot} moved to {node}",
                store=self.description,
                slot=job.slot,
                node=_where(target),
            )
        return kind

    async def _round(self, jobs: list[_Job]) -> None:
        """
        Send the commands of C{jobs}, those for one node together, and set
        their replies.
        """
        by_node: dict[Address, list[_Job]] = {}
        for job in jobs:
            if job.node is None:
                raise StoreUnavailable(f"{self.description}: slot {job.slot} is not served")
            by_node.setdefault(job.node, []).append(job)
        sent: list[Deferred[Any]] = []
        for address, group in by_node.items():
            commands = [
                c for job in group for c in ([("ASKING",)] if job.asking else []) + [job.command]
            ]
            sent.append(self._node(address).pipeline(commands).addCallback(self._deliver, group))
        for ok, value in await defer.DeferredList(sent, consumeErrors=True):
            if not ok:  # a node is unavailable: its slots may have moved (a failover)
                self._refresh().addErrback(self._refresh_failed)
                raise value.value

    @staticmethod
    def _deliver(replies: list[Any], group: list[_Job]) -> None:
        answers = iter(replies)
        for job in group:
            if job.asking:
                next(answers)
                job.asking = False
            job.reply = next(answers)

    def _node(self, address: Address) -> RedisConnection:
        if self.closed:
            raise StoreUnavailable(f"{self.description} is closed")
        node = self.nodes.get(address)
        if node is None:
            node = RedisConnection(self._reactor, *address, self._conf, tls="redis_cluster_ssl")
            self.nodes[address] = node
        return node

    def _refresh(self) -> Deferred[None]:
        """
        Fetch the slot map (once for all who ask while it is being fetched).
        """
        waiter: Deferred[None] = Deferred()
        if self._refreshing is not None:
            self._refreshing.append(waiter)
            return waiter
        self._refreshing = [waiter]
        Deferred.fromCoroutine(self._load_map()).addBoth(self._map_loaded)
        return waiter

    def _map_loaded(self, result: Any) -> None:
        waiters, self._refreshing = self._refreshing or [], None
        for waiter in waiters:
            waiter.callback(result)

    async def _load_map(self) -> None:
        known = [address for address in dict.fromkeys(self._slots or []) if address]
        cause = "no node to ask"
        for address in dict.fromkeys([*known, *self._seeds]):
            try:
                (reply,) = await self._node(address).pipeline([("CLUSTER", "SLOTS")])
            except StoreUnavailable as e:
                cause = e.cause
                continue
            if isinstance(reply, ResponseError):
                cause = f"{_where(address)} answered: {reply}"
                continue
            self._slots = _slot_map(reply, address[0])
            return
        raise StoreUnavailable(f"{self.description}: no node gave the slot map ({cause})")

    def _refresh_failed(self, failure: Failure) -> None:
        failure.trap(StoreUnavailable)
        if not self.closed:
            _log.warn("Counter store slot map: {cause}", cause=failure.value.cause)
